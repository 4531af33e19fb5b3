package fake

/** Imitates PathObjectHierarchy (QuPath 0.4+ names) for the calls the import script makes. */
class FakeHierarchy {
    FakeObject root = new FakeObject(type: 'root')
    int events = 0

    FakeObject getRootObject() { root }
    private List all(Closure keep) {
        def out = []
        def walk
        walk = { o -> for (c in o.children) { if (keep(c)) out << c; walk(c) } }
        walk(root)
        return out
    }
    Collection getAnnotationObjects() { all { it.isAnnotation() } }
    Collection getDetectionObjects() { all { it.isDetection() } }

    void removeObjects(Collection objects, boolean keepChildren) {
        for (o in objects) {
            o.parent?.children?.remove(o)
            if (keepChildren)
                for (c in new ArrayList(o.children)) { c.parent = o.parent; o.parent.children << c }
            o.parent = null
        }
        events++
    }
    boolean addObjectBelowParent(FakeObject parent, FakeObject o, boolean fire) {
        if (parent == null) parent = root
        o.parent?.children?.remove(o)
        o.parent = parent
        parent.children << o
        return true
    }
    /** QuPath's rule: below the smallest annotation that holds the object's centroid
     *  (detections) or covers it (annotations); larger objects are inserted first. */
    boolean insertPathObjects(Collection objects) {
        def sorted = new ArrayList(objects).sort { -it.getROI().getArea() }
        for (o in sorted) {
            def c = o.getROI().getCentroid()
            def holders = getAnnotationObjects().findAll {
                it != o && (o.isDetection() ? it.getROI().covers(c[0], c[1]) :
                    (0..<o.roi.xs.length).every { i -> it.getROI().covers(o.roi.xs[i], o.roi.ys[i]) } &&
                    it.getROI().getArea() > o.getROI().getArea())
            }
            def parent = holders ? holders.min { it.getROI().getArea() } : root
            addObjectBelowParent(parent, o, false)
        }
        events++
        return true
    }
    void fireHierarchyChangedEvent(Object source) { events++ }
}
