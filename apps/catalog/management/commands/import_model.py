"""Add a Hugging Face safetensors folder to the catalog (platform staff only: run on the server)."""

from django.core.management.base import BaseCommand, CommandError

from apps.catalog.services import CatalogImportError, catalog_import_folder


class Command(BaseCommand):
    help = "Import an HF-format safetensors model folder into the model cache and the catalog."

    def add_arguments(self, parser):
        parser.add_argument("folder", help="Local folder with config.json, *.safetensors and tokenizer files.")
        parser.add_argument("--id", required=True, dest="model_id", help="Stable catalog id, e.g. my-model-1b.")
        parser.add_argument("--licence", required=True, help="Licence of the weights, e.g. Apache-2.0.")
        parser.add_argument("--name", default="", help="Display name.")
        parser.add_argument("--description", default="", help="What the model is good for.")

    def handle(self, *args, folder: str, model_id: str, licence: str, name: str, description: str, **options):
        try:
            entry = catalog_import_folder(
                source=folder, model_id=model_id, name=name, licence=licence, description=description
            )
        except CatalogImportError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(f"Imported {entry.model_id}: {entry.parameter_count:,} parameters, tasks {entry.tasks}")
