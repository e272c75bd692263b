"""A small Django project on SQLite that uses carrot: what scripts/demo runs."""
import os

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_DIR = os.environ.get('CARROT_DEMO_DIR', os.path.join(BASE_DIR, 'run'))
SECRET_KEY = 'demo-only'
DEBUG = os.environ.get('CARROT_DEMO_DEBUG', '1') == '1'  # scripts/bench turns it off (as in production)
USE_TZ = True
TIME_ZONE = 'UTC'
INSTALLED_APPS = [
    'django.contrib.contenttypes',
    'django.contrib.auth',
    'carrot',
    'shop',
]
DATABASES = {'default': {
    'ENGINE': 'django.db.backends.sqlite3',
    'NAME': os.path.join(RUN_DIR, 'demo.sqlite3'),
    'OPTIONS': {'timeout': 30, 'init_command': 'PRAGMA journal_mode=WAL;'},
}}
DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'

CARROT = {
    'default_broker': os.environ.get('CARROT_DEMO_BROKER', 'amqp://guest:guest@127.0.0.1:5672/carrot-demo'),
    'queues': [
        {'name': 'default', 'concurrency': int(os.environ.get('CARROT_DEMO_CONCURRENCY', 2))},
        {'name': 'reports', 'concurrency': 1},
    ],
}
