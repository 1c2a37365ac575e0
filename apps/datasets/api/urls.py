from django.urls import path

from .views import (
    FileContentView,
    FileDetailView,
    FileListCreateView,
    FilePreviewView,
    FileValidateView,
    TokenizerDetailView,
    TokenizerListCreateView,
)

urlpatterns = [
    path("files", FileListCreateView.as_view(), name="file-list"),
    path("files/<str:public_id>", FileDetailView.as_view(), name="file-detail"),
    path("files/<str:public_id>/content", FileContentView.as_view(), name="file-content"),
    path("files/<str:public_id>/validate", FileValidateView.as_view(), name="file-validate"),
    path("files/<str:public_id>/preview", FilePreviewView.as_view(), name="file-preview"),
    path("tokenizers", TokenizerListCreateView.as_view(), name="tokenizer-list"),
    path("tokenizers/<str:public_id>", TokenizerDetailView.as_view(), name="tokenizer-detail"),
]
