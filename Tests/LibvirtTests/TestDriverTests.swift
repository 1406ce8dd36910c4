import Foundation
import Testing
import TestSupport

@testable import Libvirt

/// The wrapper against libvirt's in-process test driver: fast, no daemon.
@Suite("Libvirt wrapper on test:///default")
struct TestDriverTests {
    static let uri = "test:///default"

    /// A unique name: the default test driver's state is shared by every
    /// connection in the process, and tests run in parallel.
    static func uniqueName(_ label: String) -> String {
        "\(label)-\(UUID().uuidString.prefix(8).lowercased())"
    }

    static func domainXML(name: String, vcpus: Int = 2, memoryMiB: Int = 64) -> String {
        """
        <domain type='test'>
          <name>\(name)</name>
          <memory unit='MiB'>\(memoryMiB)</memory>
          <vcpu>\(vcpus)</vcpu>
          <os><type>hvm</type></os>
        </domain>
        """
    }

    @Test("opening a connection reads host facts")
    func hostFacts() async throws {
        let connection = try await Connection.open(Self.uri)
        let node = try await connection.nodeInfo()
        #expect(node.cpus > 0)
        #expect(node.memoryKiB > 0)
        #expect(try await connection.capabilities().contains("<capabilities>"))
        #expect(try await connection.libvirtVersion().split(separator: ".").count == 3)
        #expect(try await connection.domains().contains { $0.name == "test" })

        // The test driver's own domain has a DHCP lease on its network.
        let addresses = try await connection.domain(named: "test").interfaceAddresses()
        #expect(addresses.first?.source == .lease)
        #expect(addresses.first?.addresses.first?.family == .ipv4)
        #expect(addresses.first?.macAddress == "aa:bb:cc:dd:ee:ff")
        await connection.close()
    }

    @Test("a domain goes through define, start, suspend, resume, destroy and undefine")
    func lifecycle() async throws {
        let connection = try await Connection.open(Self.uri)
        let name = Self.uniqueName("life")
        let domain = try await connection.defineDomain(xml: Self.domainXML(name: name, vcpus: 3, memoryMiB: 96))
        #expect(domain.name == name)
        #expect(try await domain.state() == .shutoff(.unknown))
        #expect(try await domain.isPersistent())

        try await domain.start()
        #expect(try await domain.state() == .running(.booted))
        let info = try await domain.info()
        #expect(info.vcpus == 3)
        #expect(info.maxMemoryKiB == 96 * 1024)

        try await domain.suspend()
        #expect(try await domain.state() == .paused(.user))
        try await domain.resume()
        #expect(try await domain.state() == .running(.unpaused))

        try await domain.destroy()
        #expect(try await domain.state() == .shutoff(.destroyed))
        #expect(try await domain.state().description == "shut off (destroyed)")

        try await domain.setAutostart(true)
        #expect(try await domain.autostart())

        try await domain.undefine()
        let error = await #expect(throws: LibvirtError.self) { try await connection.domain(named: name) }
        #expect(error?.code == .noDomain)
        await connection.close()
    }

    @Test("lifecycle events arrive on the stream in order")
    func events() async throws {
        try await SystemLibvirt.shared { try await self.eventsInOrder() }
    }

    private func eventsInOrder() async throws {
        let connection = try await Connection.open(Self.uri)
        let events = try await connection.events()
        let name = Self.uniqueName("events")
        let domain = try await connection.defineDomain(xml: Self.domainXML(name: name))
        try await domain.start()
        try await domain.suspend()
        try await domain.resume()
        try await domain.destroy()
        try await domain.undefine()

        var kinds: [DomainEvent.Kind] = []
        for await event in events {
            guard case .domain(let domainEvent) = event, domainEvent.name == name else { continue }
            #expect(domainEvent.uuid == domain.uuid)
            kinds.append(domainEvent.kind)
            if domainEvent.kind == .undefined { break }
        }
        #expect(kinds == [.defined, .started, .suspended, .resumed, .stopped(.destroyed), .undefined])
        await connection.close()
    }

    @Test("Corral metadata is stored in the domain and read back")
    func metadata() async throws {
        let connection = try await Connection.open(Self.uri)
        let domain = try await connection.defineDomain(xml: Self.domainXML(name: Self.uniqueName("meta")))
        #expect(try await domain.instanceMetadata() == nil)

        let expires = Date(timeIntervalSince1970: 1_900_000_000)
        let metadata = InstanceMetadata(
            instance: "web-1 & \"friends\"", appliance: "rack-7", pool: "https://pool.example/", leaseExpires: expires)
        try await domain.setInstanceMetadata(metadata)
        #expect(try await domain.instanceMetadata() == metadata)

        let xml = try await domain.xml()
        #expect(xml.contains(InstanceMetadata.namespace))
        #expect(try DomainDescription(xml: xml).instance == metadata)

        try await domain.setInstanceMetadata(nil)
        #expect(try await domain.instanceMetadata() == nil)
        try await domain.undefine()
        await connection.close()
    }

    @Test("an unknown domain is a distinct, matchable error")
    func unknownDomain() async throws {
        let connection = try await Connection.open(Self.uri)
        do {
            _ = try await connection.domain(named: "no-such-domain")
            Issue.record("looking up a missing domain succeeded")
        } catch let error as LibvirtError where error.code == .noDomain {
            #expect(error.message.contains("not found"))
            #expect(error.description.contains("look up domain 'no-such-domain'"))
        }
        await connection.close()
    }

    @Test("invalid XML surfaces libvirt's parser message")
    func invalidXML() async throws {
        let connection = try await Connection.open(Self.uri)
        let error = await #expect(throws: LibvirtError.self) {
            try await connection.defineDomain(xml: "<domain type='test'><name>broken</name>")
        }
        #expect(error?.code == .xmlDetail)
        #expect(error?.operation == "define domain")
        #expect(error?.message.contains("Premature end of data") == true)

        let missing = await #expect(throws: LibvirtError.self) {
            try await connection.defineDomain(xml: "<domain type='test'><name>no-memory</name></domain>")
        }
        #expect(missing?.message.isEmpty == false)
        await connection.close()
    }

    @Test("connecting where no daemon listens fails with a connection error")
    func noDaemon() async throws {
        let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
        let error = await #expect(throws: LibvirtError.self) { try await Connection.open(uri) }
        #expect(error?.operation == "connect to libvirt at \(uri)")
        #expect(error?.message.contains("/nonexistent/libvirt-sock") == true)
    }

    @Test("a closed connection refuses calls")
    func closed() async throws {
        let connection = try await Connection.open(Self.uri)
        await connection.close()
        let error = await #expect(throws: LibvirtError.self) { try await connection.domains() }
        #expect(error?.code == .noConnect)
    }

    @Test("domain XML is parsed into disks, interfaces and console path")
    func description() throws {
        let xml = """
            <domain type='qemu'>
              <name>web</name><uuid>8f7b2c1e-8a55-4c7e-9f2b-0c9d5e1a2b3c</uuid>
              <memory unit='KiB'>262144</memory><vcpu placement='static'>2</vcpu>
              <devices>
                <disk type='file' device='disk'>
                  <driver name='qemu' type='qcow2'/><source file='/var/lib/corral/web.qcow2'/><target dev='vda' bus='virtio'/>
                </disk>
                <disk type='file' device='cdrom'><source file='/var/lib/corral/web-seed.iso'/><target dev='sda'/></disk>
                <interface type='network'>
                  <mac address='52:54:00:aa:bb:cc'/><source network='default'/><model type='virtio'/>
                </interface>
                <serial type='file'><source path='/var/log/corral/web.console'/><target port='0'/></serial>
              </devices>
            </domain>
            """
        let description = try DomainDescription(xml: xml)
        #expect(description.name == "web")
        #expect(description.virtType == "qemu")
        #expect(description.vcpus == 2)
        #expect(description.memoryKiB == 262_144)
        #expect(
            description.disks == [
                .init(target: "vda", source: "/var/lib/corral/web.qcow2", format: "qcow2", device: "disk"),
                .init(target: "sda", source: "/var/lib/corral/web-seed.iso", format: nil, device: "cdrom"),
            ])
        #expect(
            description.interfaces == [
                .init(type: "network", macAddress: "52:54:00:aa:bb:cc", source: "default", model: "virtio")
            ])
        #expect(description.consoleLogPath == "/var/log/corral/web.console")
        #expect(description.instance == nil)
    }
}

@Suite("KVM probe kernel")
struct KVMProbeTests {
    @Test("the embedded probe kernel is what scripts/kvm-probe.S assembles to")
    func embeddedBytesMatchSource() async throws {
        let result = try await runCommand(Paths.packageRoot.appendingPathComponent("scripts/kvm-probe-bytes"), [])
        try #require(result.status == 0, "scripts/kvm-probe-bytes failed (binutils missing?): \(result.stderr)")
        #expect(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == KVMProbe.hex)
        #expect(KVMProbe.kernel.count == KVMProbe.hex.utf8.count / 2)
        // The multiboot magic opens the file.
        #expect(Array(KVMProbe.kernel.prefix(4)) == [0x02, 0xB0, 0xAD, 0x1B])
    }
}
