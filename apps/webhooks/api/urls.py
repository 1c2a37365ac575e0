from django.urls import path

from .views import WebhookDeliveryListView, WebhookEndpointDetailView, WebhookEndpointListCreateView

urlpatterns = [
    path("webhooks", WebhookEndpointListCreateView.as_view(), name="webhook-list"),
    path("webhooks/<str:public_id>", WebhookEndpointDetailView.as_view(), name="webhook-detail"),
    path("webhooks/<str:public_id>/deliveries", WebhookDeliveryListView.as_view(), name="webhook-deliveries"),
]
