from django.urls import path

from .views import FileContentView, FileDetailView, FileListCreateView

urlpatterns = [
    path("files", FileListCreateView.as_view(), name="file-list"),
    path("files/<str:public_id>", FileDetailView.as_view(), name="file-detail"),
    path("files/<str:public_id>/content", FileContentView.as_view(), name="file-content"),
]
