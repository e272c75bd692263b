"""manage.py carrot-workers: the same as manage.py carrot (the name some deployments use)."""
from carrot.management.commands.carrot import Command

__all__ = ['Command']
