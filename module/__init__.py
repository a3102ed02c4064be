"""Azure IoT Edge adapter: the only package that imports azure-iot-device."""
