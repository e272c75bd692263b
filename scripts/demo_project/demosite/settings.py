"""A small Django project on SQLite that uses carrot: what scripts/demo runs."""
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
DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'

CARROT = {
    'default_broker': os.environ.get('CARROT_DEMO_BROKER', 'amqp://guest:guest@127.0.0.1:5672/carrot-demo'),
    'queues': [
        {'name': 'default', 'concurrency': int(os.environ.get('CARROT_DEMO_CONCURRENCY', 2))},
        {'name': 'reports', 'concurrency': 1},
    ],
}
