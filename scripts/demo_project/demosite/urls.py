from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path('', RedirectView.as_view(url='/carrot/')),
    path('admin/', admin.site.urls),
    path('carrot/', include('carrot.urls')),
]
