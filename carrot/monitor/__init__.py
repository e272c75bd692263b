"""The carrot monitor: server-rendered pages, a JSON API and the actions behind both.

Mount it with ``path('carrot/', include('carrot.urls'))``. Modules: access (who may see it), queries
(lists, search, paging, the JSON shape of a row), broker_stats (ready/consumer counts from RabbitMQ),
workers (supervisor snapshots), tasklog (the captured log, by level), actions (everything that changes
state), forms, views (HTML), api (JSON).
"""
