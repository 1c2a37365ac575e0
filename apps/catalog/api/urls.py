from django.urls import path

from .views import ModelDetailView, ModelListView

urlpatterns = [
    path("models", ModelListView.as_view(), name="model-list"),
    path("models/<str:model_id>", ModelDetailView.as_view(), name="model-detail"),
]
