from django.urls import path

from .views import (
    JobCancelView,
    JobDetailView,
    JobEvaluationDetailView,
    JobEvaluationListCreateView,
    JobEventsView,
    JobGenerateView,
    JobListCreateView,
)

urlpatterns = [
    path("fine_tuning/jobs", JobListCreateView.as_view(), name="job-list"),
    path("fine_tuning/jobs/<str:public_id>", JobDetailView.as_view(), name="job-detail"),
    path("fine_tuning/jobs/<str:public_id>/events", JobEventsView.as_view(), name="job-events"),
    path("fine_tuning/jobs/<str:public_id>/cancel", JobCancelView.as_view(), name="job-cancel"),
    path("fine_tuning/jobs/<str:public_id>/generate", JobGenerateView.as_view(), name="job-generate"),
    path("fine_tuning/jobs/<str:public_id>/evaluations", JobEvaluationListCreateView.as_view(), name="job-evaluations"),
    path(
        "fine_tuning/jobs/<str:public_id>/evaluations/<str:evaluation_id>",
        JobEvaluationDetailView.as_view(),
        name="job-evaluation-detail",
    ),
]
