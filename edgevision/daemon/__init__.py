"""The appliance daemon: button, camera, microphone and speaker around the models, as a systemd service."""
