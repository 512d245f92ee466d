"""TOTP devices in the admin, where staff enrol: add a device, scan its QR code, confirm."""

from django_otp import login as otp_login
from django_otp.plugins.otp_totp.admin import TOTPDeviceAdmin
from django_otp.plugins.otp_totp.models import TOTPDevice


class OwnTOTPDeviceAdmin(TOTPDeviceAdmin):
    """TOTP devices: superusers manage everyone's; other staff see and add only their own."""

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        return queryset if request.user.is_superuser else queryset.filter(user=request.user)

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        return fields if request.user.is_superuser else [*fields, "user"]

    def save_model(self, request, obj, form, change):
        if not request.user.is_superuser:
            obj.user = request.user
        super().save_model(request, obj, form, change)
        if obj.user_id == request.user.pk and obj.confirmed and not request.user.is_verified():
            # The session that enrolled the device stays in (it would otherwise be refused on the
            # next page, before the QR code was shown); the next login asks for the code.
            otp_login(request, obj)


def register_device_admin(site):
    """Replace django-otp's TOTP device admin on `site` with OwnTOTPDeviceAdmin."""
    if site.is_registered(TOTPDevice):
        site.unregister(TOTPDevice)
    site.register(TOTPDevice, OwnTOTPDeviceAdmin)
