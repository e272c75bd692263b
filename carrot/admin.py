from django.contrib import admin, messages

from carrot.exceptions import CarrotError
from carrot.models import MessageLog, ScheduledTask


@admin.register(MessageLog)
class MessageLogAdmin(admin.ModelAdmin):
    list_display = ('task', 'status', 'queue', 'attempts', 'worker', 'publish_time', 'completion_time',
                    'failure_time')
    list_filter = ('status', 'queue', 'task')
    search_fields = ('uuid', 'task', 'exception')
    date_hierarchy = 'publish_time'
    readonly_fields = ('uuid', 'publish_time', 'started_time', 'completion_time', 'failure_time', 'attempts',
                       'worker')
    actions = ['requeue']

    @admin.action(description='Requeue the selected messages (publish a copy, delete the original)')
    def requeue(self, request, queryset):
        done = 0
        for log in queryset:
            try:
                log.requeue()
                done += 1
            except CarrotError as exc:
                self.message_user(request, f'{log.task} ({log.uuid}) was not requeued: {exc}', messages.ERROR)
        if done:
            self.message_user(request, f'{done} message(s) requeued.', messages.SUCCESS)


@admin.register(ScheduledTask)
class ScheduledTaskAdmin(admin.ModelAdmin):
    list_display = ('task_name', 'task', 'interval_display', 'queue', 'active', 'last_run_time')
    list_filter = ('active', 'queue', 'interval_type')
    search_fields = ('task_name', 'task')
