from django.urls import path

from .views import (
    AuditDetailView,
    AuditPolicyView,
    JobAuditsView,
    ReviewDecisionsView,
    ReviewDetailView,
    ReviewListView,
)

urlpatterns = [
    path("fine_tuning/jobs/<str:public_id>/audits", JobAuditsView.as_view(), name="job-audits"),
    path("audits/<str:public_id>", AuditDetailView.as_view(), name="audit-detail"),
    path("audit_policy", AuditPolicyView.as_view(), name="audit-policy"),
    # Platform staff only: anyone else gets the 404 of a path that does not exist.
    path("reviews", ReviewListView.as_view(), name="review-list"),
    path("reviews/<str:public_id>", ReviewDetailView.as_view(), name="review-detail"),
    path("reviews/<str:public_id>/decisions", ReviewDecisionsView.as_view(), name="review-decisions"),
]
