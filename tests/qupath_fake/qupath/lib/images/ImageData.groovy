package qupath.lib.images

import fake.FakeHierarchy

/** Imitates QuPath's ImageData: hierarchy, image type and the properties saved with the image.
 *  (getProperty/setProperty are QuPath's names; use methods, not Groovy property syntax, here.) */
class ImageData {
    static enum ImageType { UNSET, BRIGHTFIELD_H_E, BRIGHTFIELD_H_DAB, FLUORESCENCE }

    private FakeHierarchy hier = new FakeHierarchy()
    private ImageType type = ImageType.UNSET
    private Map props = [:]

    FakeHierarchy getHierarchy() { hier }
    ImageType getImageType() { type }
    void setImageType(ImageType t) { type = t }
    Object getProperty(String key) { props[key] }
    void setProperty(String key, Object value) { props[key] = value }
    Map propertyMap() { props }
}
