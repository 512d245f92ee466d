"""What goes in and out of the API: one input shape, a public shape and a staff shape."""

import copy

from django.core.validators import EmailValidator
from django.db import models
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from . import captcha, honeypot, scanning
from .fields import EncryptedEmailField
from .models import (
    CONTACT_FIELDS,
    PUBLIC_FIELDS,
    AttemptOutcome,
    EmailAttempt,
    EmailRequest,
    EmailStatus,
    VirusScan,
)
from .permissions import can_view_personal_data
from .replies import BODY_MAX_LENGTH
from .throttling import client_ip
from .validators import (
    validate_attachment,
    validate_email_shape,
    validate_header_safe,
    validate_header_safe_required,
    validate_no_nul,
    validate_phone,
)

# One-line text fields: they end up in mail headers (Subject) or beside them, so no line breaks.
TEXT_LINE_FIELDS = ["full_name", "job_profession", "subject"]
# A field hidden from people by the contact form; only bots fill it in.
HONEYPOT_FIELD = "website"
# The contact page's signed time of serving (email_service/honeypot.py).
FORM_STAMP_FIELD = "form_stamp"
CAPTCHA_MISSING = "Please complete the CAPTCHA check."
CAPTCHA_REFUSED = "The CAPTCHA check failed or expired; please complete it again."


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of turning them into text."""

    # Run on the value as sent, before trimming: a line break at either end is refused, not cut.
    untrimmed_validators = ()

    def run_validation(self, data=serializers.empty):
        # Before CharField's own run_validation, which turns a blank-after-trimming value into "".
        if isinstance(data, str):
            for validator in self.untrimmed_validators:
                validator(data)
        return super().run_validation(data)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictEmailField(serializers.EmailField, StrictCharField):
    pass


class PrototypeFieldsMixin:
    """Build a serializer class's fields once and give each instance shallow copies of them.

    ModelSerializer works its fields out from the model on every instance: about a fifth of a
    JSON POST's CPU here, for a result that depends only on the class. `build_fields` is that
    work, done once per class; an instance gets a copy of each field, which it then binds to
    itself (name, parent, label), so no two serializers share a bound field. What the copies
    share (options, error messages, the validator lists) is only read once built. A field that
    is itself a serializer holds a child bound to its parent, which a shallow copy would share
    between requests: a class with one is refused.
    """

    def get_fields(self):
        cls = type(self)
        prototype = cls.__dict__.get("_prototype_fields")
        if prototype is None:
            prototype = self.build_fields()
            nested = [
                name for name, field in prototype.items() if isinstance(field, serializers.BaseSerializer)
            ]
            if nested:
                raise TypeError(f"{cls.__name__}: fields {nested} are serializers; they cannot be shared")
            # Per class (cls.__dict__, not inherited): a subclass builds its own.
            cls._prototype_fields = prototype
        return {name: copy.copy(field) for name, field in prototype.items()}

    def build_fields(self):
        return super().get_fields()


class ContactFieldsSerializer(PrototypeFieldsMixin, serializers.ModelSerializer):
    """The contact fields with their rules: trimmed, model lengths, header-safe."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.EmailField: StrictEmailField,
        # The address is stored encrypted (a TextField underneath), but is still an address.
        EncryptedEmailField: StrictEmailField,
    }

    class Meta:
        model = EmailRequest
        fields = CONTACT_FIELDS
        extra_kwargs = {
            "full_name": {"required": True, "allow_blank": False},
            "email": {"required": True, "allow_blank": False},
        }

    def build_fields(self):
        fields = super().build_fields()
        # One pattern per field, so that the OpenAPI schema states each rule exactly; the
        # email and phone patterns leave no room for line breaks or control characters either.
        for name in TEXT_LINE_FIELDS:
            required = fields[name].required
            fields[name].validators.append(
                validate_header_safe_required if required else validate_header_safe
            )
            fields[name].untrimmed_validators = (validate_header_safe,)
        # Django's EmailValidator would repeat the same error; the pattern says all of it, and
        # unlike the validator it can be stated in the schema.
        fields["email"].validators = [
            v for v in fields["email"].validators if not isinstance(v, EmailValidator)
        ] + [validate_email_shape]
        fields["phone"].validators.append(validate_phone)
        fields["message"].validators.append(validate_no_nul)
        return fields


class EmailRequestCreateSerializer(ContactFieldsSerializer):
    file_attached = serializers.FileField(required=False, allow_empty_file=True, use_url=False)
    website = StrictCharField(
        validators=[validate_no_nul],
        required=False,
        allow_blank=True,
        write_only=True,
        help_text="Leave empty. A hidden field: a submission that fills it is treated as spam.",
    )

    form_stamp = StrictCharField(
        validators=[validate_no_nul],
        required=False,
        allow_blank=True,
        write_only=True,
        max_length=200,
        help_text="The contact page's signed time of serving, sent back as it came. Optional: a "
        "submission that carries one sent back too soon, or a forged one, is treated as spam.",
    )

    class Meta(ContactFieldsSerializer.Meta):
        fields = [*CONTACT_FIELDS, "file_attached", HONEYPOT_FIELD, FORM_STAMP_FIELD]

    def get_fields(self):
        fields = super().get_fields()
        # Added per instance: the provider is read from the settings at call time.
        provider = captcha.active_provider()
        if provider:
            # Under the provider's own name, as its widget puts the token in the form.
            fields[provider.token_field] = StrictCharField(
                write_only=True,
                max_length=captcha.TOKEN_MAX_LENGTH,
                error_messages={"required": CAPTCHA_MISSING, "blank": CAPTCHA_MISSING},
                help_text=f"The token of the {provider.name} widget.",
            )
        return fields

    def validate_file_attached(self, upload):
        self.context["attachment_content_type"] = validate_attachment(upload)
        return upload

    def validate(self, attrs):
        # Once every field is valid, the checks that cost a call out: the CAPTCHA first, then the
        # virus scan, so a refused token never costs a scan. A submission the honeypot will catch
        # goes through them too: its answer must be the one a real submission would get.
        attrs = super().validate(attrs)
        provider = captcha.active_provider()
        if provider:
            token = attrs.pop(provider.token_field)
            outcome = captcha.verify(token, remote_ip=self._client_ip(), provider=provider)
            if outcome == captcha.REFUSED:
                raise serializers.ValidationError({provider.token_field: [CAPTCHA_REFUSED]}, code="captcha")
            attrs["captcha_unverified"] = outcome == captcha.UNAVAILABLE
        upload = attrs.get("file_attached")
        if upload is not None:
            attrs["virus_scan"] = self._scan(upload)
        return attrs

    def _client_ip(self):
        request = self.context.get("request")
        return client_ip(request) if request is not None else None

    def _scan(self, upload):
        try:
            # Raises ScannerUnavailable (503) itself when EMAIL_CLAMAV_REQUIRED refuses unscanned files.
            result = scanning.check_upload(upload)
        except serializers.ValidationError as infected:
            raise serializers.ValidationError({"file_attached": infected.detail}) from infected
        if result is None:
            return VirusScan.DISABLED
        return VirusScan.CLEAN if result.is_clean else VirusScan.UNAVAILABLE

    def is_spam(self):
        """Say whether the honeypot caught this submission: its hidden field filled, or sent too fast."""
        data = self.validated_data
        return bool(data.get(HONEYPOT_FIELD)) or honeypot.is_filled_too_fast(data.get(FORM_STAMP_FIELD))

    def contact_data(self):
        """Return what is stored of the submission: the validated data without the honeypot's fields."""
        data = dict(self.validated_data)
        for name in (HONEYPOT_FIELD, FORM_STAMP_FIELD):
            data.pop(name, None)
        return data


class EmailRequestJSONSerializer(EmailRequestCreateSerializer):
    """The submission as JSON: the same fields without the file, which only multipart can carry."""

    class Meta(EmailRequestCreateSerializer.Meta):
        fields = [*CONTACT_FIELDS, HONEYPOT_FIELD, FORM_STAMP_FIELD]


class EmailRequestUpdateSerializer(ContactFieldsSerializer):
    """The contact fields staff may edit; the edited request is answered in the staff shape, or
    in the public one to a user who may change requests but not view them."""

    class Meta(ContactFieldsSerializer.Meta):
        pass

    def to_representation(self, instance):
        if can_view_personal_data(self.context.get("request")):
            return EmailRequestStaffSerializer(instance, context=self.context).data
        return EmailRequestPublicSerializer(instance, context=self.context).data


class EmailRequestCreatedSerializer(serializers.Serializer):
    """The answer to a submission."""

    message = serializers.CharField()
    email_request_id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=EmailStatus.choices)
    task_id = serializers.CharField()


class EmailRequestPublicSerializer(serializers.ModelSerializer):
    """What anyone may see of a request: no personal or health data."""

    has_attachment = serializers.BooleanField(read_only=True)

    class Meta:
        model = EmailRequest
        fields = list(PUBLIC_FIELDS)
        read_only_fields = fields


class EmailAttemptSerializer(serializers.ModelSerializer):
    """One delivery attempt; while it runs, `outcome` is "" and `finished_at` null."""

    # Declared rather than derived: ModelSerializer drops allow_blank from read-only fields, and
    # the schema must let a running attempt's empty outcome through.
    outcome = serializers.ChoiceField(
        choices=AttemptOutcome.choices,
        allow_blank=True,
        read_only=True,
        help_text="How the attempt ended; empty while it is still running.",
    )

    class Meta:
        model = EmailAttempt
        fields = [
            "number",
            "started_at",
            "finished_at",
            "outcome",
            "smtp_code",
            "error_class",
            "error_text",
            "worker",
            "duration_ms",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "finished_at": {"help_text": "When the attempt ended; null while it is still running."}
        }


class EmailRequestStaffSerializer(serializers.ModelSerializer):
    """Everything about a request, for staff with view permission."""

    has_attachment = serializers.BooleanField(read_only=True)
    attachment_url = serializers.SerializerMethodField()
    attempts = EmailAttemptSerializer(many=True, read_only=True)
    # Declared for the same reason as EmailAttemptSerializer.outcome: blank is a value here.
    virus_scan = serializers.ChoiceField(
        choices=VirusScan.choices,
        allow_blank=True,
        read_only=True,
        help_text="What the virus scanner said about the file; empty without a file.",
    )

    class Meta:
        model = EmailRequest
        fields = [
            "id",
            *CONTACT_FIELDS,
            "status",
            "has_attachment",
            "attachment_name",
            "attachment_size",
            "attachment_content_type",
            "attachment_url",
            "error_message",
            "retry_count",
            "max_retries",
            "manual_retries",
            "next_attempt_at",
            "celery_task_id",
            "message_id",
            "claimed_by",
            "confirmation_sent_at",
            "confirmation_error",
            "client_ip",
            "captcha_unverified",
            "virus_scan",
            "created_at",
            "updated_at",
            "sent_at",
            "attempts",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_attachment_url(self, obj):
        if not obj.has_attachment:
            return None
        url = reverse("email-request-attachment", args=[obj.pk])
        request = self.context.get("request")
        return request.build_absolute_uri(url) if request else url


class StatisticsSerializer(serializers.Serializer):
    total_requests = serializers.IntegerField()
    pending_requests = serializers.IntegerField()
    processing_requests = serializers.IntegerField()
    sent_requests = serializers.IntegerField()
    failed_requests = serializers.IntegerField()
    cancelled_requests = serializers.IntegerField()
    with_attachments = serializers.IntegerField()
    unverified_requests = serializers.IntegerField(
        help_text="Accepted while the CAPTCHA provider could not be reached."
    )
    unscanned_attachments = serializers.IntegerField(
        help_text="Files accepted while the virus scanner could not be reached."
    )
    success_rate = serializers.FloatField(help_text="Percent of finished requests that were SENT.")
    requests_last_24h = serializers.IntegerField()
    sent_last_24h = serializers.IntegerField()
    failed_last_24h = serializers.IntegerField()
    median_delivery_seconds = serializers.FloatField(
        allow_null=True, help_text="Median seconds from submission to SENT; null before the first."
    )
    p95_delivery_seconds = serializers.FloatField(
        allow_null=True, help_text="95th percentile seconds from submission to SENT."
    )
    as_of = serializers.DateTimeField(
        help_text="When these figures were taken; they are shared for EMAIL_STATISTICS_CACHE_SECONDS."
    )


class RetryFailedSerializer(serializers.Serializer):
    message = serializers.CharField()
    count = serializers.IntegerField()


class DetailSerializer(serializers.Serializer):
    detail = serializers.CharField()


# --- Replies to the submitter (issue 14) --------------------------------------------------------
class EmailReplySerializer(serializers.ModelSerializer):
    """A staff reply to the submitter, with who wrote it and its delivery status."""

    body = serializers.CharField(source="message", read_only=True)
    author = serializers.CharField(
        source="author.username", read_only=True, allow_null=True, help_text="Null once the user is deleted."
    )

    class Meta:
        model = EmailRequest
        fields = [
            "id",
            "body",
            "author",
            "status",
            "created_at",
            "sent_at",
            "retry_count",
            "error_message",
            "message_id",
        ]
        read_only_fields = fields


class EmailReplyCreateSerializer(serializers.Serializer):
    """What staff write: the reply's text, sent as the mail's body."""

    body = StrictCharField(max_length=BODY_MAX_LENGTH, validators=[validate_no_nul])
