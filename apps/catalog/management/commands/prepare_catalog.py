"""Convert the offline base models into the model cache (once; later runs return at once) and sync the catalog."""

from django.core.management.base import BaseCommand, CommandError

from apps.catalog.services import catalog_prepare_offline, catalog_sync_builtin


class Command(BaseCommand):
    help = "Prepare the base-model catalog: convert the offline models from their wheels and list every entry."

    def add_arguments(self, parser):
        parser.add_argument(
            "--no-convert", action="store_true", help="Only sync the entries; do not convert missing models."
        )

    def handle(self, *args, no_convert: bool = False, **options):
        from transformers.utils import logging as transformers_logging

        # One line per entry is the useful output; per-tensor progress bars would bury it in the `make up` log.
        transformers_logging.disable_progress_bar()
        try:
            entries = catalog_sync_builtin() if no_convert else catalog_prepare_offline()
        except FileNotFoundError as error:
            raise CommandError(str(error)) from error
        for entry in entries:
            self.stdout.write(f"{entry.model_id:<24} {entry.status:<8} {entry.parameter_count:>13,} parameters")
