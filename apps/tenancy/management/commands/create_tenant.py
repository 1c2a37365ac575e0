import json

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from apps.tenancy.services import api_key_create, tenant_create


class Command(BaseCommand):
    help = "Create a tenant with its owner and an API key; prints one JSON object (tenant, owner, api_key)."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--owner-email", required=True)
        parser.add_argument("--name", default="")
        parser.add_argument("--password", default=None, help="Owner's password; without it the owner cannot sign in.")

    def handle(self, *args, slug, owner_email, name, password, **options):
        user_model = get_user_model()
        email = owner_email.strip().lower()
        try:
            with transaction.atomic():
                owner, created = user_model.objects.get_or_create(username=email, defaults={"email": email})
                if created:
                    if password:
                        owner.set_password(password)
                    else:
                        owner.set_unusable_password()
                    owner.save()
                tenant = tenant_create(slug=slug, name=name, owner=owner)
                key = api_key_create(tenant=tenant, user=owner, name="created by create_tenant")
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        self.stdout.write(
            json.dumps(
                {"tenant": tenant.slug, "tenant_id": tenant.pk, "owner": owner.get_username(), "api_key": key.secret}
            )
        )
