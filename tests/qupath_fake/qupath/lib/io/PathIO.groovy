package qupath.lib.io

import com.google.gson.JsonParser
import fake.FakeObject

/** Imitates QuPath's GeoJSON reader: one object per Feature, the whole file rejected when a
 *  classification has no colour (as QuPath 0.5.1 does), ids kept when they are UUIDs. */
class PathIO {
    static List readObjectsFromGeoJSON(InputStream stream) {
        def root = JsonParser.parseReader(new InputStreamReader(stream, 'UTF-8')).getAsJsonObject()
        def out = []
        for (f in root.getAsJsonArray('features'))
            out << FakeObject.fromFeature(f.getAsJsonObject())
        return out
    }
}
