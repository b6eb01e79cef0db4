"""Tools around the service, run from a checkout: start it, derive profiles, write the KubeRay manifest, build
the tiny random-weight test checkpoint, run the offline demo. The application never imports them, and they
are not in the wheel."""
