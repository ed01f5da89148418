"""``python -m dsm_redis nemesis``: minutes of random faults against real processes, real Redis and
real PostgreSQL, and a checker that judges the history they leave.

``run`` drives a run end to end (servers, hosts, workers, faults, the report); ``workers`` is what
each worker process executes (random operations, each recorded in the history); ``models`` holds
the nemesis's Django app (label ``dsm_redis_nemesis``: the shared accounts and the journal);
``faults`` injects the faults and ``netns`` builds the hosts (network namespaces) and partitions
them; ``proxy`` relays PostgreSQL's unix socket onto the hosts' links; ``history`` is the event
format and ``checker`` the four rules. The library core never imports this package.
"""
