"""carrot-supervisor's carrot side: the command line, the image builder, the child bodies (consumer,
scheduler, housekeeping), autoreload, the log file and the status snapshot's copy in the database.
The generic master itself is the top-level `supervisor` package, which knows nothing of Django or pika.
"""
