"""The scheduled-task form of the monitor. Choices come from what is registered and configured; the
rest of the validation is ScheduledTask.clean() (carrot/schedule/rules.py), shared with the admin."""
from __future__ import annotations

from django import forms

from carrot.models import ScheduledTask


def task_choices(current: str | None = None) -> list[tuple[str, str]]:
    from carrot.registry import registered_task_names
    names = registered_task_names()
    if current and current not in names:
        # An old row naming a task that is gone: show it, and let clean() say why it cannot be saved.
        names = [current, *names]
    return [('', '— choose a task —')] + [(name, name) for name in names]


def queue_choices() -> list[tuple[str, str]]:
    from carrot.config import get_config
    return [(queue.name, queue.name) for queue in get_config().all_queues]


class ScheduledTaskForm(forms.ModelForm):
    task = forms.ChoiceField(choices=())
    queue = forms.ChoiceField(choices=())
    task_name = forms.CharField(max_length=200, required=False,
                                help_text='A unique name for this schedule (default: the task path)')

    class Meta:
        model = ScheduledTask
        fields = ('task_name', 'task', 'queue', 'interval_count', 'interval_type', 'task_args', 'content',
                  'active')
        labels = {'interval_count': 'Every', 'interval_type': 'Interval type'}
        widgets = {
            'task_args': forms.Textarea(attrs={'rows': 3, 'placeholder': '[1, "two"]', 'spellcheck': 'false'}),
            'content': forms.Textarea(attrs={'rows': 3, 'placeholder': '{"order_id": 42}',
                                             'spellcheck': 'false'}),
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields['task'].choices = task_choices(self.instance.task if self.instance.pk else None)
        self.fields['queue'].choices = queue_choices()
        if not self.instance.pk:
            self.initial.setdefault('queue', 'default')

    def clean_task_name(self):
        return self.cleaned_data.get('task_name', '').strip() or self.data.get('task', '')

    def save(self, commit=True):
        schedule = super().save(commit=False)
        schedule.routing_key = schedule.queue
        if commit:
            schedule.save()
        return schedule
