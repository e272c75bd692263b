"""Keep the broker password out of Django's error pages and error e-mails.

Django's default filter already hides dict entries whose key looks secret (``'password'``), so a CARROT
broker given as a dict is safe; a broker URL (``amqp://user:secret@host/``) is not. Setting

    DEFAULT_EXCEPTION_REPORTER_FILTER = 'carrot.debug.SafeExceptionReporterFilter'

masks the password of every URL in the settings too, and otherwise behaves as Django's own filter.
"""
from django.views.debug import SafeExceptionReporterFilter as DjangoFilter

from carrot.config.secrets import mask_url


class SafeExceptionReporterFilter(DjangoFilter):
    def cleanse_setting(self, key, value):
        value = super().cleanse_setting(key, value)
        if isinstance(value, str):
            return mask_url(value)
        return value
