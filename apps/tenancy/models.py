"""Tenants, memberships and API keys, plus the one door through which tenant-owned rows are read."""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from apps.core.ids import new_public_id

# The largest value PostgreSQL's integer column holds: a bigger limit would fail on save instead of answering 400.
INFERENCE_LIMIT_MAX = 2_147_483_647
INFERENCE_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day")


def _inference_limit_field(help_text: str) -> models.PositiveIntegerField:
    return models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(INFERENCE_LIMIT_MAX)],
        help_text=help_text,
    )


class Tenant(models.Model):
    """An organisation: it owns files, jobs, models and endpoints; users reach it through a Membership."""

    slug = models.SlugField(max_length=50, unique=True)
    name = models.CharField(max_length=120)
    created_at = models.DateTimeField(auto_now_add=True)
    max_upload_bytes = models.BigIntegerField(null=True, blank=True, help_text="Overrides MAX_UPLOAD_BYTES when set.")
    max_running_jobs = models.PositiveIntegerField(
        null=True, blank=True, help_text="Overrides MAX_RUNNING_JOBS_PER_TENANT when set; more jobs wait queued."
    )
    # Inference limits of the whole team (every key and the dashboard together); empty: the platform default.
    requests_per_minute = _inference_limit_field("Inference requests per minute; empty: the platform default.")
    tokens_per_minute = _inference_limit_field(
        "Inference tokens (prompt + completion) per minute; empty: the platform default."
    )
    tokens_per_day = _inference_limit_field(
        "Inference tokens (prompt + completion) per UTC day; empty: the platform default."
    )

    def __str__(self) -> str:
        return self.slug


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer"


# What each role may do; checked by services, never by templates alone.
ROLES_THAT_CAN_WRITE = {Role.OWNER, Role.ADMIN, Role.MEMBER}
ROLES_THAT_CAN_MANAGE = {Role.OWNER, Role.ADMIN}


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="one_membership_per_user_and_tenant")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} as {self.role}"


class TenantQuerySet(models.QuerySet):
    def for_tenant(self, tenant: Tenant | int) -> "TenantQuerySet":
        tenant_id = tenant if isinstance(tenant, int) else tenant.pk
        if tenant_id is None:
            raise ValueError("for_tenant() needs a saved tenant")
        return self.filter(tenant_id=tenant_id)


class TenantOwnedModel(models.Model):
    """Base of every tenant-owned model: reads go through `Model.objects.for_tenant(tenant)`.

    Public ids (`file-…`, `ftjob-…`) are looked up only inside one tenant's rows, so another tenant's id is simply
    not found: 404, never 403.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")

    objects = TenantQuerySet.as_manager()

    class Meta:
        abstract = True


class KeyPermissions(models.TextChoices):
    """What an API key may do in its tenant, chosen when it is made (OpenAI's "All" / "Restricted" / "Read only")."""

    ALL = "all", "All"  # what a team member can do
    # Completions, chat completions, predictions and the model list. For applications in production: a leaked key
    # can run the endpoints but not read datasets, start jobs or deploy.
    INFERENCE = "inference", "Inference only"
    # Lists and reads everything, changes nothing and runs no inference: for monitoring and CI dashboards.
    READ_ONLY = "read_only", "Read only"


def _new_api_key_public_id() -> str:
    return new_public_id("key")


class ApiKey(TenantOwnedModel):
    """A tenant's API key. Only its sha256 is stored; the key itself is shown once, at creation."""

    public_id = models.CharField(max_length=40, unique=True, default=_new_api_key_public_id, editable=False)
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="The first characters of the key, shown to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    permissions = models.CharField(max_length=10, choices=KeyPermissions.choices, default=KeyPermissions.ALL)
    # Caps of this key alone, below the team's limits (a key cannot raise them); empty: no cap of its own.
    requests_per_minute = _inference_limit_field(
        "Inference requests per minute with this key; empty: INFERENCE_REQUESTS_PER_MINUTE_PER_KEY."
    )
    tokens_per_minute = _inference_limit_field("Inference tokens per minute with this key; empty: no own cap.")
    tokens_per_day = _inference_limit_field("Inference tokens per UTC day with this key; empty: no own cap.")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
