from django.urls import path

from tests.testapp import views

urlpatterns = [
    path("ping", views.ping),
    path("deposit/<int:pk>", views.deposit),
]
