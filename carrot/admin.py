"""carrot in the Django admin: task logs (read, requeue, never added by hand) and scheduled tasks
(validated on save by ScheduledTask.clean(), run now, activate/deactivate); the other carrot's Task rows
(created here, they run) and Worker rows (queues with a concurrency; the supervisor takes them on HUP)."""
from django.contrib import admin, messages

from carrot.exceptions import CarrotError
from carrot.models import MessageLog, ScheduledTask, SupervisorStatus, Task, TaskAttempt, Worker


class TaskAttemptInline(admin.TabularInline):
    """The attempts of a task that did not succeed (see README.rst, "Retries"), read only."""
    model = TaskAttempt
    fields = ('number', 'outcome', 'worker', 'started_time', 'finished_time', 'exception_class', 'exception')
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(MessageLog)
class MessageLogAdmin(admin.ModelAdmin):
    list_display = ('task', 'status', 'queue', 'attempts', 'worker', 'publish_time', 'completion_time',
                    'failure_time')
    list_filter = ('status', 'queue', 'task')
    search_fields = ('uuid', 'task', 'exception', 'task_args', 'content')
    date_hierarchy = 'publish_time'
    readonly_fields = ('uuid', 'status', 'publish_time', 'run_after', 'started_time', 'completion_time',
                       'failure_time', 'attempts', 'retries', 'worker', 'lease_expires')
    actions = ['requeue']
    inlines = [TaskAttemptInline]

    def has_add_permission(self, request):
        # A row is written by publishing a message; one typed in by hand would describe nothing real.
        return False

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
    list_display = ('task_name', 'task', 'interval_display', 'queue', 'active', 'last_run_time', 'problem')
    list_filter = ('active', 'queue', 'interval_type')
    search_fields = ('task_name', 'task', 'task_args', 'content')
    readonly_fields = ('last_run_time', 'problem')
    actions = ['run_now', 'activate', 'deactivate']

    def get_form(self, request, obj=None, **kwargs):
        # The monitor's form: tasks and queues as drop-downs of what is registered and configured.
        from carrot.monitor.forms import ScheduledTaskForm
        kwargs['form'] = ScheduledTaskForm
        kwargs.setdefault('fields', ScheduledTaskForm.Meta.fields)
        return super().get_form(request, obj, **kwargs)

    @admin.display(description='Interval')
    def interval_display(self, schedule):
        return schedule.interval_display

    @admin.action(description='Run the selected schedules now')
    def run_now(self, request, queryset):
        done = 0
        for schedule in queryset:
            try:
                schedule.publish()
                done += 1
            except CarrotError as exc:
                self.message_user(request, f'{schedule.task_name} was not run: {exc}', messages.ERROR)
        if done:
            self.message_user(request, f'{done} scheduled task(s) published now.', messages.SUCCESS)

    @admin.action(description='Activate the selected schedules')
    def activate(self, request, queryset):
        count = queryset.update(active=True)
        self.message_user(request, f'{count} scheduled task(s) activated.', messages.SUCCESS)

    @admin.action(description='Deactivate (pause) the selected schedules')
    def deactivate(self, request, queryset):
        count = queryset.update(active=False)
        self.message_user(request, f'{count} scheduled task(s) paused.', messages.SUCCESS)


@admin.register(SupervisorStatus)
class SupervisorStatusAdmin(admin.ModelAdmin):
    list_display = ('name', 'host', 'pid', 'generation', 'started', 'last_seen')
    search_fields = ('name', 'host')
    readonly_fields = ('name', 'host', 'pid', 'started', 'last_seen', 'generation', 'document')

    def has_add_permission(self, request):
        return False


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ('name', 'concurrency', 'enabled', 'description')
    list_filter = ('enabled',)
    search_fields = ('name', 'description')


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ('kallable', 'worker', 'status_display', 'created_on', 'started_on', 'completed_on')
    list_filter = ('worker',)
    search_fields = ('kallable', 'message_id')
    readonly_fields = ('message_id', 'status_display', 'started_on', 'completed_on', 'message')

    def get_readonly_fields(self, request, obj=None):
        # Once created, a Task is sent: what it runs cannot change any more.
        return self.readonly_fields + (('kallable', 'args', 'kwargs', 'worker') if obj is not None else ())

    @admin.display(description='Status')
    def status_display(self, task):
        return task.get_status_display()
