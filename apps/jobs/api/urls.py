from django.urls import path

from .views import (
    JobCancelView,
    JobCheckpointsView,
    JobDetailView,
    JobEstimateView,
    JobEvaluationDetailView,
    JobEvaluationListCreateView,
    JobEventsView,
    JobGenerateView,
    JobListCreateView,
    JobMetricsView,
    JobPauseView,
    JobResumeView,
)

urlpatterns = [
    path("fine_tuning/jobs", JobListCreateView.as_view(), name="job-list"),
    # Before the <public_id> route, which would otherwise take "estimate" for a job id.
    path("fine_tuning/jobs/estimate", JobEstimateView.as_view(), name="job-estimate"),
    path("fine_tuning/jobs/<str:public_id>", JobDetailView.as_view(), name="job-detail"),
    path("fine_tuning/jobs/<str:public_id>/events", JobEventsView.as_view(), name="job-events"),
    path("fine_tuning/jobs/<str:public_id>/checkpoints", JobCheckpointsView.as_view(), name="job-checkpoints"),
    path("fine_tuning/jobs/<str:public_id>/metrics", JobMetricsView.as_view(), name="job-metrics"),
    path("fine_tuning/jobs/<str:public_id>/cancel", JobCancelView.as_view(), name="job-cancel"),
    path("fine_tuning/jobs/<str:public_id>/pause", JobPauseView.as_view(), name="job-pause"),
    path("fine_tuning/jobs/<str:public_id>/resume", JobResumeView.as_view(), name="job-resume"),
    path("fine_tuning/jobs/<str:public_id>/generate", JobGenerateView.as_view(), name="job-generate"),
    path("fine_tuning/jobs/<str:public_id>/evaluations", JobEvaluationListCreateView.as_view(), name="job-evaluations"),
    path(
        "fine_tuning/jobs/<str:public_id>/evaluations/<str:evaluation_id>",
        JobEvaluationDetailView.as_view(),
        name="job-evaluation-detail",
    ),
]
