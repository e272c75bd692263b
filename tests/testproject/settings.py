"""Settings of the Django project the tests (and the supervisor subprocesses they start) run.

Environment:
  CARROT_TEST_DB      sqlite (default) or postgres
  CARROT_TEST_DB_NAME the database to use as is (set for subprocesses so they share the test database)
  CARROT_TEST_VHOST   the RabbitMQ virtual host of this test run (made up once per run, inherited by
                      subprocesses, created and deleted by tests/conftest.py)
  CARROT_TEST_EXTRA   a file of Python that may change CARROT (supervisor tests edit it, then send HUP)
"""
import importlib.util
import os
import tempfile
import uuid

BASE_DIR = os.path.dirname(os.path.abspath(__file__))
SECRET_KEY = 'carrot-tests-only'
DEBUG = False
ALLOWED_HOSTS = ['*']
USE_TZ = True
TIME_ZONE = 'UTC'

INSTALLED_APPS = [
    'django.contrib.admin',
    'django.contrib.auth',
    'django.contrib.contenttypes',
    'django.contrib.sessions',
    'django.contrib.messages',
    'django.contrib.staticfiles',  # the monitor's CSS and JS, served by the browser tests' live server
    'carrot',
    'tests.testapp',
]
MIDDLEWARE = [
    'django.contrib.sessions.middleware.SessionMiddleware',
    'django.middleware.common.CommonMiddleware',
    'django.middleware.csrf.CsrfViewMiddleware',
    'django.contrib.auth.middleware.AuthenticationMiddleware',
    'django.contrib.messages.middleware.MessageMiddleware',
]
ROOT_URLCONF = 'tests.testproject.urls'
TEMPLATES = [{
    'BACKEND': 'django.template.backends.django.DjangoTemplates',
    'DIRS': [],
    'APP_DIRS': True,
    'OPTIONS': {'context_processors': [
        'django.template.context_processors.request',
        'django.contrib.auth.context_processors.auth',
        'django.contrib.messages.context_processors.messages',
    ]},
}]
DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'
STATIC_URL = '/static/'

RUN_ID = os.environ.setdefault('CARROT_TEST_RUN_ID', uuid.uuid4().hex[:8])
VHOST = os.environ.setdefault('CARROT_TEST_VHOST', f'carrot-test-{RUN_ID}')

if os.environ.get('CARROT_TEST_DB', 'sqlite') == 'postgres':
    DATABASES = {'default': {
        'ENGINE': 'django.db.backends.postgresql',
        'NAME': os.environ.get('CARROT_TEST_DB_NAME', 'carrot'),
        'USER': os.environ.get('PGUSER', 'postgres'),
        'PASSWORD': os.environ.get('PGPASSWORD', ''),
        'HOST': os.environ.get('PGHOST', '127.0.0.1'),
        'PORT': os.environ.get('PGPORT', '5432'),
        'TEST': {'NAME': f'test_carrot_{RUN_ID}'},
    }}
else:
    sqlite_file = os.path.join(tempfile.gettempdir(), f'carrot-test-{RUN_ID}.sqlite3')
    DATABASES = {'default': {
        'ENGINE': 'django.db.backends.sqlite3',
        'NAME': os.environ.get('CARROT_TEST_DB_NAME', sqlite_file),
        # Several processes (the tests, consumers, a scheduler) share the file: wait for locks, and let
        # readers go on while one writes.
        'OPTIONS': {'timeout': 30, 'init_command': 'PRAGMA journal_mode=WAL;'},
        'TEST': {'NAME': sqlite_file},
    }}

CARROT = {
    'default_broker': f'amqp://guest:guest@127.0.0.1:5672/{VHOST}',
    'queues': [
        {'name': 'default', 'concurrency': 1},
        {'name': 'other', 'concurrency': 1},
    ],
    'cleanup_after_days': 3,
}

# Django's tasks API on carrot (tests/test_backend.py): django.tasks on Django 6, the django-tasks backport
# (a test extra) on 5.2.
TASKS = {'default': {'BACKEND': 'carrot.backends.CarrotBackend', 'QUEUES': ['default', 'other']}}
if importlib.util.find_spec('django.tasks') is None and importlib.util.find_spec('django_tasks') is not None:
    INSTALLED_APPS.append('django_tasks')

LOGGING = {
    'version': 1,
    'disable_existing_loggers': False,
    'loggers': {'carrot': {'level': 'INFO'},
                'pika': {'level': 'WARNING'}},
}

_extra = os.environ.get('CARROT_TEST_EXTRA')
if _extra and os.path.exists(_extra):
    with open(_extra) as f:
        exec(compile(f.read(), _extra, 'exec'))
