from django.urls import path

from .inference import chat_completions, completions
from .views import EndpointDetailView, EndpointListCreateView, EndpointPredictView, EndpointUsageView

urlpatterns = [
    path("endpoints", EndpointListCreateView.as_view(), name="endpoint-list"),
    path("endpoints/<str:public_id>", EndpointDetailView.as_view(), name="endpoint-detail"),
    path("endpoints/<str:public_id>/predict", EndpointPredictView.as_view(), name="endpoint-predict"),
    path("endpoints/<str:public_id>/usage", EndpointUsageView.as_view(), name="endpoint-usage"),
    path("completions", completions, name="completions"),
    path("chat/completions", chat_completions, name="chat-completions"),
]
