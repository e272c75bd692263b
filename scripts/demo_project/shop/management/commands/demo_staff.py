"""Create (or reset) the demo's staff login for the monitor and the admin. Demo only: a fixed password."""
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand

USERNAME, PASSWORD = 'demo', 'carrot-demo'


class Command(BaseCommand):
    help = 'Create the demo staff user (demo / carrot-demo).'

    def handle(self, *args, **options):
        user, _ = User.objects.get_or_create(username=USERNAME)
        user.is_staff = user.is_superuser = True
        user.set_password(PASSWORD)
        user.save()
        self.stdout.write(f'{USERNAME} / {PASSWORD}')
