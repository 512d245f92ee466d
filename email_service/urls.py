from rest_framework.routers import DefaultRouter

from .views import EmailRequestViewSet

router = DefaultRouter()
router.register("emails", EmailRequestViewSet, basename="email-request")

urlpatterns = router.urls
