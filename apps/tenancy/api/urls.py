from django.urls import path

from .views import ApiKeyDetailView, ApiKeyListCreateView, OrganizationLimitsView

urlpatterns = [
    path("api_keys", ApiKeyListCreateView.as_view(), name="api-key-list"),
    path("api_keys/<str:public_id>", ApiKeyDetailView.as_view(), name="api-key-detail"),
    # Platform staff only: anyone else gets the 404 of a path that does not exist.
    path("organizations/<slug:slug>/limits", OrganizationLimitsView.as_view(), name="organization-limits"),
]
