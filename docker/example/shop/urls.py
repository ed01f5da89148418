from django.urls import path

from . import views

urlpatterns = [
    path("healthz", views.healthz),
    path("stats", views.stats),
    path("subscriptions", views.create),
    path("subscriptions/<int:pk>", views.detail),
    path("subscriptions/<int:pk>/<str:edge>", views.transition),
    path("subscriptions/<int:pk>/<str:edge>/async", views.enqueue),
]
