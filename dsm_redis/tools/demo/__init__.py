"""``python -m dsm_redis demo``: N processes race the same transitions on shared objects, first with
deus-state-machina's unprotected "cowboy" code, then through dsm_redis, and the demo reports what
each lost.

``models`` holds the demo's Django app (label ``dsm_redis_demo``), ``environment`` its settings,
database and Redis keys, ``run`` drives a run end to end, ``workers`` is what each spawned process
executes, and ``report`` draws the progress bar and the result table.
"""

# Seconds between a read and the write that depends on it: stands for an external call (a card
# charge, an e-mail). Every race window in the demo is at least this wide.
EXTERNAL_CALL = 0.002
