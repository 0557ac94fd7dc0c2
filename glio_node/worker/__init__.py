"""The node's background work, one module per step of the data flow (docs/architecture.md):

- :mod:`~glio_node.worker.sweep`: quiet series -> jobs;
- :mod:`~glio_node.worker.run`: claim a job, run it in a worker thread with its lease renewed,
  finish it (objects and deliveries recorded) or fail / retry it;
- :mod:`~glio_node.worker.liveness`: this node's heartbeat; the work of nodes that are gone
  taken back;
- :mod:`~glio_node.worker.deliver`: result objects to the destinations;
- :mod:`~glio_node.worker.commit`: Storage Commitment requests for what was delivered;
- :mod:`~glio_node.worker.purge`: the spool emptied of what every destination has.

Each step is a function (or, for running jobs, a class that keeps its threads) of a
:class:`~glio_node.worker.context.WorkContext`; :mod:`glio_node.scheduler` builds that once and
calls the steps on APScheduler's timers.  Nothing here imports the receiver, the poller or the
status page: what a step needs of them (the spool's folders, the commitment report handler) is
passed in.
"""
