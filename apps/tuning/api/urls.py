from django.urls import path

from .views import (
    StudyCancelView,
    StudyDetailView,
    StudyListCreateView,
    StudyTrialDetailView,
    StudyTrialPromoteView,
    StudyTrialsView,
)

urlpatterns = [
    path("tuning/studies", StudyListCreateView.as_view(), name="study-list"),
    path("tuning/studies/<str:public_id>", StudyDetailView.as_view(), name="study-detail"),
    path("tuning/studies/<str:public_id>/cancel", StudyCancelView.as_view(), name="study-cancel"),
    path("tuning/studies/<str:public_id>/trials", StudyTrialsView.as_view(), name="study-trials"),
    # <str:number>, not <int:...>: a number that is not one answers "no such trial" in the API's error shape.
    path("tuning/studies/<str:public_id>/trials/<str:number>", StudyTrialDetailView.as_view(), name="study-trial"),
    path(
        "tuning/studies/<str:public_id>/trials/<str:number>/promote",
        StudyTrialPromoteView.as_view(),
        name="study-trial-promote",
    ),
]
