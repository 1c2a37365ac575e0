from django.contrib.auth import views as auth_views
from django.urls import path

from . import views

app_name = "dashboard"

urlpatterns = [
    path("", views.home, name="home"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("signup/", views.signup, name="signup"),
    path("tenants/switch/", views.switch_tenant, name="switch-tenant"),
    path("jobs/<str:public_id>/", views.job_detail, name="job-detail"),
    path("settings/api-keys/", views.api_keys, name="api-keys"),
    path("files/<str:public_id>/", views.file_detail, name="file-detail"),
    path("files/<str:public_id>/errors.csv", views.file_errors_csv, name="file-errors-csv"),
    path("tokenizers/", views.tokenizers, name="tokenizers"),
    path("tokenizers/<str:public_id>/", views.tokenizer_detail, name="tokenizer-detail"),
]
