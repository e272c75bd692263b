"""A small Django project that uses carrot: what scripts/demo runs (on SQLite) and scripts/bench measures
(on PostgreSQL).

Environment: CARROT_DEMO_DIR (database file and log), CARROT_DEMO_BROKER, CARROT_DEMO_CONCURRENCY (the
'default' queue's), CARROT_DEMO_DEBUG, and for scripts/bench CARROT_DEMO_DB, CARROT_DEMO_DB_NAME and
CARROT_DEMO_TRACK, CARROT_DEMO_PREFETCH and CARROT_DEMO_CLAIM_AHEAD (see below)."""
import os

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where scripts/demo keeps the database and the log: the checkout's demo-run/, so `python manage.py shell`
# (or runserver) in this directory afterwards finds the demo's data.
RUN_DIR = os.environ.get('CARROT_DEMO_DIR', os.path.join(BASE_DIR, '..', '..', 'demo-run'))
SECRET_KEY = 'demo-only'
ALLOWED_HOSTS = ['127.0.0.1', 'localhost']
# DEBUG also makes `runserver` (scripts/demo --serve) serve the monitor's static files; scripts/bench
# turns it off (as in production: DEBUG keeps every query in memory).
DEBUG = os.environ.get('CARROT_DEMO_DEBUG', '1') == '1'
USE_TZ = True
TIME_ZONE = 'UTC'
INSTALLED_APPS = [
    'django.contrib.admin',
    'django.contrib.contenttypes',
    'django.contrib.auth',
    'django.contrib.sessions',
    'django.contrib.messages',
    'django.contrib.staticfiles',
    'carrot',
    'shop',
]
MIDDLEWARE = [
    'django.middleware.security.SecurityMiddleware',
    'django.contrib.sessions.middleware.SessionMiddleware',
    'django.middleware.common.CommonMiddleware',
    'django.middleware.csrf.CsrfViewMiddleware',
    'django.contrib.auth.middleware.AuthenticationMiddleware',
    'django.contrib.messages.middleware.MessageMiddleware',
]
ROOT_URLCONF = 'demosite.urls'  # the monitor at /carrot/, the admin at /admin/
TEMPLATES = [{
    'BACKEND': 'django.template.backends.django.DjangoTemplates',
    'APP_DIRS': True,
    'OPTIONS': {'context_processors': [
        'django.template.context_processors.request',
        'django.contrib.auth.context_processors.auth',
        'django.contrib.messages.context_processors.messages',
    ]},
}]
STATIC_URL = '/static/'
DATABASES = {'default': {
    'ENGINE': 'django.db.backends.sqlite3',
    'NAME': os.path.join(RUN_DIR, 'demo.sqlite3'),
    'OPTIONS': {'timeout': 30, 'init_command': 'PRAGMA journal_mode=WAL;'},
}}
# scripts/bench measures on PostgreSQL, the database a production site runs (SQLite serialises every
# writer, so its figures would be SQLite's). It creates and drops the database CARROT_DEMO_DB_NAME itself;
# the login comes from libpq's usual variables, as scripts/services prints them.
if os.environ.get('CARROT_DEMO_DB') == 'postgres':
    DATABASES = {'default': {
        'ENGINE': 'django.db.backends.postgresql',
        'NAME': os.environ.get('CARROT_DEMO_DB_NAME', 'carrot_demo'),
        'USER': os.environ.get('PGUSER', 'postgres'),
        'PASSWORD': os.environ.get('PGPASSWORD', ''),
        'HOST': os.environ.get('PGHOST', '127.0.0.1'),
        'PORT': os.environ.get('PGPORT', '5432'),
    }}
DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'

DEFAULT_QUEUE = {'name': 'default', 'concurrency': int(os.environ.get('CARROT_DEMO_CONCURRENCY', 2))}
# scripts/bench's track='failures' row (successful tasks leave no log row). Only set when asked, so a carrot
# that does not know the key yet still reads these settings.
if os.environ.get('CARROT_DEMO_TRACK'):
    DEFAULT_QUEUE['track'] = os.environ['CARROT_DEMO_TRACK']
if os.environ.get('CARROT_DEMO_PREFETCH'):  # scripts/bench --prefetch
    DEFAULT_QUEUE['prefetch'] = int(os.environ['CARROT_DEMO_PREFETCH'])

CARROT = {
    'default_broker': os.environ.get('CARROT_DEMO_BROKER', 'amqp://guest:guest@127.0.0.1:5672/carrot-demo'),
    'queues': [
        DEFAULT_QUEUE,
        {'name': 'reports', 'concurrency': 1},
    ],
}
if os.environ.get('CARROT_DEMO_CLAIM_AHEAD') == '0':  # scripts/bench --no-claim-ahead
    CARROT['claim_ahead'] = False
