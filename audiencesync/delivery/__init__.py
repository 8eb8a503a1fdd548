"""Delivering what is pending to Gleap: fair across audiences, bounded, resumable.

Owns a delivery pass (``deliverer.Deliverer``): the turns audiences take (``call_turns``),
what each identify call carries (``identify_calls``, ``payload``, ``field_winners``),
the marks set before a call leaves (``unknown_marks``), the answers recorded in
batches (``record_batches``), the events sent to the track endpoint (``track``), the
progress line (``progress_log``) and the gate renames wait at (``pass_gate``).

May import store, gleap, config and the top-level leaves; never refresh (the two meet
only in sync). Imported by lifecycle (retire), sync, the daemon and the cli.
"""
