package fake

import com.google.gson.JsonObject

class FakeROI {
    double[] xs, ys
    double getArea() {
        double a = 0
        for (int i = 0; i < xs.length - 1; i++) a += xs[i] * ys[i + 1] - xs[i + 1] * ys[i]
        return Math.abs(a) / 2
    }
    double[] getCentroid() {  // area centroid, as QuPath's ClosedShapeStatistics
        double a = 0, cx = 0, cy = 0
        for (int i = 0; i < xs.length - 1; i++) {
            double c = xs[i] * ys[i + 1] - xs[i + 1] * ys[i]
            a += c; cx += (xs[i] + xs[i + 1]) * c; cy += (ys[i] + ys[i + 1]) * c
        }
        return [cx / (3 * a), cy / (3 * a)] as double[]
    }
    boolean isArea() { true }
    boolean covers(double x, double y) {  // crossing test; points on the boundary count
        boolean inside = false
        int j = xs.length - 2
        for (int i = 0; i < xs.length - 1; i++) {
            if (onSegment(x, y, xs[i], ys[i], xs[j], ys[j])) return true
            if ((ys[i] > y) != (ys[j] > y) && x < (xs[j] - xs[i]) * (y - ys[i]) / (ys[j] - ys[i]) + xs[i])
                inside = !inside
            j = i
        }
        return inside
    }
    private static boolean onSegment(double x, double y, double x1, double y1, double x2, double y2) {
        double cross = (x - x1) * (y2 - y1) - (y - y1) * (x2 - x1)
        return Math.abs(cross) < 1e-9 && x >= Math.min(x1, x2) && x <= Math.max(x1, x2) &&
            y >= Math.min(y1, y2) && y <= Math.max(y1, y2)
    }
}

class FakeMeasurements {
    Map values = [:]
    boolean containsKey(String k) { values.containsKey(k) }
    List getMeasurementNames() { new ArrayList(values.keySet()) }
}

class FakeObject {
    String type  // 'annotation', 'detection', 'cell', 'root'
    UUID id = UUID.randomUUID()
    String name
    String pathClass
    FakeROI roi
    FakeMeasurements measurements = new FakeMeasurements()
    FakeObject parent
    List children = []

    UUID getID() { id }
    String getName() { name }
    String getPathClass() { pathClass }
    boolean hasROI() { roi != null }
    FakeROI getROI() { roi }
    boolean isDetection() { type == 'detection' || type == 'cell' }
    boolean isAnnotation() { type == 'annotation' }
    FakeMeasurements getMeasurementList() { measurements }
    List getChildObjects() { Collections.unmodifiableList(children) }

    static FakeObject fromFeature(JsonObject f) {
        def props = f.has('properties') ? f.getAsJsonObject('properties') : new JsonObject()
        def o = new FakeObject(type: props.has('objectType') ? props.get('objectType').getAsString() : 'annotation')
        if (f.has('id')) {
            try { o.id = UUID.fromString(f.get('id').getAsString()) } catch (IllegalArgumentException ignored) { }
        }
        if (props.has('name')) o.name = props.get('name').getAsString()
        if (props.has('classification')) {
            def c = props.getAsJsonObject('classification')
            if (!c.has('color'))
                throw new IOException('Unable to parse PathClass (no color)')  // QuPath 0.5.1 rejects the file
            o.pathClass = c.get('name').getAsString()
        }
        if (props.has('measurements'))
            for (e in props.getAsJsonObject('measurements').entrySet())
                o.measurements.values[e.key] = e.value.getAsDouble()
        def ring = f.getAsJsonObject('geometry').getAsJsonArray('coordinates').get(0).getAsJsonArray()
        def xs = new double[ring.size()], ys = new double[ring.size()]
        for (int i = 0; i < ring.size(); i++) {  // QuPath keeps vertices as float
            xs[i] = (double) (float) ring.get(i).getAsJsonArray().get(0).getAsDouble()
            ys[i] = (double) (float) ring.get(i).getAsJsonArray().get(1).getAsDouble()
        }
        o.roi = new FakeROI(xs: xs, ys: ys)
        return o
    }

    Map toMap() {
        [type: type, id: id.toString(), name: name, pathClass: pathClass, xs: roi?.xs, ys: roi?.ys,
         measurements: measurements.values, children: children.collect { it.toMap() }]
    }

    static FakeObject fromMap(Map m) {
        def o = new FakeObject(type: m.type, id: UUID.fromString(m.id), name: m.name, pathClass: m.pathClass)
        if (m.xs != null) o.roi = new FakeROI(xs: m.xs as double[], ys: m.ys as double[])
        o.measurements.values.putAll(m.measurements)
        for (c in m.children) {
            def child = fromMap(c)
            child.parent = o
            o.children << child
        }
        return o
    }
}
