"""The carrot monitor. Mount it in the project's URLconf: ``path('carrot/', include('carrot.urls'))``."""
from django.urls import path

from carrot.monitor import api, views

app_name = 'carrot'

urlpatterns = [
    path('', views.message_list, {'tab': 'queued'}, name='queued'),
    path('failed/', views.message_list, {'tab': 'failed'}, name='failed'),
    path('completed/', views.message_list, {'tab': 'completed'}, name='completed'),
    path('waiting/', views.message_list, {'tab': 'waiting'}, name='waiting'),
    path('later/', views.message_list, {'tab': 'later'}, name='later'),
    path('scheduled/', views.schedule_list, name='scheduled'),
    path('scheduled/new/', views.schedule_edit, name='schedule-new'),
    path('scheduled/<int:pk>/', views.schedule_edit, name='schedule-edit'),
    path('scheduled/<int:pk>/delete/', views.schedule_delete, name='schedule-delete'),
    path('scheduled/<int:pk>/<str:action>/', views.schedule_action, name='schedule-action'),
    path('workers/', views.worker_list, name='workers'),
    path('workers/forget-gone/', views.forget_gone_supervisors, name='forget-gone'),
    path('task/<str:uuid>/', views.message_detail, name='detail'),
    path('task/<str:uuid>/<str:action>/', views.message_action, name='message-action'),
    path('bulk/<str:action>/', views.bulk_action, name='bulk'),

    path('api/messages/', api.message_list, name='api-messages'),
    path('api/messages/<str:uuid>/', api.message_detail, name='api-message'),
    path('api/messages/<str:uuid>/<str:action>/', api.message_action, name='api-message-action'),
    path('api/failed/<str:action>/', api.failed_action, name='api-failed-action'),
    path('api/queues/<str:name>/purge/', api.purge_queue, name='api-purge'),
    path('api/overview/', api.overview_document, name='api-overview'),
    path('api/workers/', api.worker_list, name='api-workers'),
    path('api/workers/forget-gone/', api.forget_gone_supervisors, name='api-forget-gone'),
    path('api/scheduled/', api.schedule_list, name='api-schedules'),
    path('api/scheduled/<int:pk>/', api.schedule_detail, name='api-schedule'),
    path('api/scheduled/<int:pk>/<str:action>/', api.schedule_action, name='api-schedule-action'),
]
