"""The staff admin site: a TOTP second factor for whoever has one, for everyone with ADMIN_REQUIRE_2FA.

The admin app is installed as `medcor_backend2.apps.StaffAdminConfig`, so `admin.site` (and every `@admin.register`) is
this site. Staff enrol by adding a TOTP device for themselves under "TOTP devices" and scanning its
QR code; from then on their login asks for the six-digit code.
"""

from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.signals import user_login_failed
from django.core.exceptions import ValidationError
from django_otp import devices_for_user, user_has_device
from django_otp.admin import OTPAdminAuthenticationForm, OTPAdminSite

from email_service import conf

NO_DEVICE = (
    "This admin asks for a code from an authenticator app, and your account has no TOTP device yet: "
    "ask an administrator to add one for you."
)


def needs_second_factor(user):
    """Whether `user` must pass a TOTP check to use the admin."""
    return conf.admin_require_2fa() or user_has_device(user, confirmed=True)


class StaffAuthenticationForm(OTPAdminAuthenticationForm):
    """The admin login: password, then the TOTP code when the user needs one."""

    def clean(self):
        self.cleaned_data = AdminAuthenticationForm.clean(self)
        user = self.get_user()
        if user is not None and needs_second_factor(user):
            try:
                if not user_has_device(user, confirmed=True):
                    raise ValidationError(NO_DEVICE, code="no_device")
                self.clean_otp(user)
            except ValidationError:
                # A failed login like a wrong password: on the audit trail and counted by the lockout.
                user_login_failed.send(
                    sender=__name__, credentials={"username": user.get_username()}, request=self.request
                )
                raise
        return self.cleaned_data

    def _chosen_device(self, user):
        device = super()._chosen_device(user)
        if device is None and not self.cleaned_data.get("otp_device"):
            # With one device there is nothing to choose: the code alone is asked for.
            devices = list(devices_for_user(user, confirmed=True))
            device = devices[0] if len(devices) == 1 else None
        return device


class StaffAdminSite(OTPAdminSite):
    login_form = StaffAuthenticationForm

    def __init__(self, name="admin"):
        super().__init__(name)

    def has_permission(self, request):
        # AdminSite's own check (active staff), then the second factor if this user needs one.
        if not admin.AdminSite.has_permission(self, request):
            return False
        return request.user.is_verified() or not needs_second_factor(request.user)
