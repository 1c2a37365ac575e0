from django.contrib.auth import views as auth_views
from django.urls import path

from . import views, views_audits, views_endpoints, views_jobs, views_new_job, views_studies, views_workspace

app_name = "dashboard"

urlpatterns = [
    path("", views_workspace.home, name="home"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("signup/", views.signup, name="signup"),
    path("tenants/switch/", views.switch_tenant, name="switch-tenant"),
    path("datasets/", views_workspace.datasets, name="datasets"),
    path("models/", views_new_job.catalog, name="catalog"),
    path("jobs/", views_workspace.jobs, name="jobs"),
    path("jobs/new/", views_new_job.new_job, name="job-new"),
    path("jobs/compare/", views_jobs.compare, name="job-compare"),
    path("jobs/<str:public_id>/", views_jobs.job_detail, name="job-detail"),
    path("jobs/<str:public_id>/audits/", views_audits.job_audit_create, name="job-audit-create"),
    path("audits/<str:public_id>/", views_audits.audit_detail, name="audit-detail"),
    path("reviews/", views_audits.reviews, name="reviews"),
    path("reviews/<str:public_id>/", views_audits.review_detail, name="review-detail"),
    path("studies/", views_studies.studies, name="studies"),
    path("studies/new/", views_studies.study_new, name="study-new"),
    path("studies/<str:public_id>/", views_studies.study_detail, name="study-detail"),
    path("studies/<str:public_id>/trials/", views_studies.study_trials, name="study-trials"),
    path("studies/<str:public_id>/cancel/", views_studies.cancel_study, name="study-cancel"),
    path(
        "studies/<str:public_id>/trials/<int:number>/promote/",
        views_studies.promote_trial,
        name="study-trial-promote",
    ),
    path("endpoints/", views_endpoints.endpoints, name="endpoints"),
    path("endpoints/compare/", views_endpoints.endpoint_compare, name="endpoint-compare"),
    path("endpoints/<str:public_id>/", views_endpoints.endpoint_detail, name="endpoint-detail"),
    path("settings/", views_workspace.settings_page, name="settings"),
    path("settings/api-keys/", views.api_keys, name="api-keys"),
    path("settings/audit-policy/", views_audits.audit_policy_save, name="audit-policy"),
    path("files/<str:public_id>/", views.file_detail, name="file-detail"),
    path("files/<str:public_id>/errors.csv", views.file_errors_csv, name="file-errors-csv"),
    path("tokenizers/", views.tokenizers, name="tokenizers"),
    path("tokenizers/<str:public_id>/", views.tokenizer_detail, name="tokenizer-detail"),
]
