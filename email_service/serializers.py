"""What goes in and out of the API: one input shape, a public shape and a staff shape."""

from django.core.validators import EmailValidator
from django.db import models
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .fields import EncryptedEmailField
from .models import CONTACT_FIELDS, AttemptOutcome, EmailAttempt, EmailRequest, EmailStatus
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


class ContactFieldsSerializer(serializers.ModelSerializer):
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

    def get_fields(self):
        fields = super().get_fields()
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

    class Meta(ContactFieldsSerializer.Meta):
        fields = [*CONTACT_FIELDS, "file_attached", HONEYPOT_FIELD]

    def validate_file_attached(self, upload):
        self.context["attachment_content_type"] = validate_attachment(upload)
        return upload

    def is_spam(self):
        return bool(self.validated_data.get(HONEYPOT_FIELD))


class EmailRequestJSONSerializer(EmailRequestCreateSerializer):
    """The submission as JSON: the same fields without the file, which only multipart can carry."""

    class Meta(EmailRequestCreateSerializer.Meta):
        fields = [*CONTACT_FIELDS, HONEYPOT_FIELD]


class EmailRequestUpdateSerializer(ContactFieldsSerializer):
    """The contact fields staff may edit; the edited request is answered in the staff shape."""

    class Meta(ContactFieldsSerializer.Meta):
        pass

    def to_representation(self, instance):
        return EmailRequestStaffSerializer(instance, context=self.context).data


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
        fields = ["id", "status", "has_attachment", "created_at", "sent_at"]
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
