from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _sync_builtin_entries(sender, **kwargs) -> None:
    # After every migrate (and every test database flush) the built-in entries exist, so `gpt2-tiny` and friends
    # are always known; pretrained entries stay `missing` until `prepare_catalog` has converted their weights.
    from .services import catalog_sync_builtin

    catalog_sync_builtin()


class CatalogConfig(AppConfig):
    name = "apps.catalog"
    label = "catalog"

    def ready(self) -> None:
        post_migrate.connect(_sync_builtin_entries, sender=self, dispatch_uid="catalog-sync-builtin")
