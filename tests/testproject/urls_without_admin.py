"""A project that mounts the monitor but not the admin (tests/test_monitor.py)."""
from django.urls import include, path

urlpatterns = [path('tasks/', include('carrot.urls'))]
