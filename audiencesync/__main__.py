import sys

from audiencesync.cli import main

sys.exit(main())
