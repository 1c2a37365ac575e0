from django.urls import path

from .views import ModelDetailView, ModelListView

urlpatterns = [
    path("models", ModelListView.as_view(), name="model-list"),
    # `path`, not `str`: a fine-tuned model's name holds colons, and a suffix may hold a slash.
    path("models/<path:model_id>", ModelDetailView.as_view(), name="model-detail"),
]
