import sys

from audiencesync.cli.main import main

sys.exit(main())
