"""The consume side: one delivery in, one task run, one disposition out.

- `loop`: the Consumer (the 1.x class; `carrot.consumer.Consumer` is its face): the connection thread's
  loop, lease renewal, time limit, settling;
- `processor`: decode -> claim -> run -> record -> Disposition (no pika);
- `claim`, `logrows`, `dbretry`: the claim protocol, the log rows, waiting out database faults;
- `task_thread`, `runner`: the thread a task runs in, and the one place that calls a task.
"""
