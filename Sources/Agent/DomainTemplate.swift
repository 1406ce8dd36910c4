import Foundation
import Libvirt
import PoolAPI

/// The libvirt domain of an instance, made from its flavor, disk, seed and
/// the appliance's network settings.
struct DomainTemplate: Sendable {
    var name: String
    var uuid: String
    /// `qemu` or `kvm`.
    var virtType: String
    var flavor: InstanceFlavor
    var disk: String
    /// The cached image the disk's overlay stands on, and its format: the
    /// domain states the whole chain, so libvirt never probes an image for
    /// what it stands on.
    var base: (path: String, format: String)
    var seed: String
    var consoleLog: String
    var macAddress: String
    var network: AgentConfiguration.Network
    var sshPort: Int?
    var kernel: (kernel: String, initrd: String?, cmdline: String)?
    var metadata: InstanceMetadata

    func xml() -> String {
        var os = "<type arch='x86_64' machine='pc'>hvm</type>"
        if let kernel {
            os += "\n    <kernel>\(escape(kernel.kernel))</kernel>"
            if let initrd = kernel.initrd { os += "\n    <initrd>\(escape(initrd))</initrd>" }
            os += "\n    <cmdline>\(escape(kernel.cmdline))</cmdline>"
        } else {
            os += "\n    <boot dev='hd'/>"
        }
        let mac = escape(macAddress)
        var interface = ""
        var qemuArguments = ""
        switch network {
        case .user(let ports) where ports != nil && sshPort != nil:
            // libvirt 9 offers no port forward on a user-mode <interface>, so
            // the NIC is QEMU's own, with the forward bound to loopback.
            let netdev =
                "user,id=corral0,net=\(userNetwork),dhcpstart=\(userGuestAddress),hostfwd=tcp:127.0.0.1:\(sshPort!)-:22"
            let device = "virtio-net-pci,netdev=corral0,mac=\(macAddress),bus=pci.0,addr=0x10"
            qemuArguments = """

                  <qemu:commandline>
                    <qemu:arg value='-netdev'/>
                    <qemu:arg value='\(escape(netdev))'/>
                    <qemu:arg value='-device'/>
                    <qemu:arg value='\(escape(device))'/>
                  </qemu:commandline>
                """
        case .user:
            interface = "<interface type='user'><mac address='\(mac)'/><model type='virtio'/></interface>"
        case .network(let name):
            interface =
                "<interface type='network'><source network='\(escape(name))'/><mac address='\(mac)'/><model type='virtio'/></interface>"
        case .bridge(let name):
            interface =
                "<interface type='bridge'><source bridge='\(escape(name))'/><mac address='\(mac)'/><model type='virtio'/></interface>"
        }
        return """
            <domain type='\(escape(virtType))' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
              <name>\(escape(name))</name>
              <uuid>\(escape(uuid))</uuid>
              <metadata>
                \(metadata.renderForDomainXML())
              </metadata>
              <memory unit='MiB'>\(flavor.memory)</memory>
              <vcpu>\(flavor.vcpus)</vcpu>
              <os>
                \(os)
              </os>
              <features><acpi/></features>
              <on_poweroff>destroy</on_poweroff>
              <on_reboot>restart</on_reboot>
              <on_crash>destroy</on_crash>
              <devices>
                <disk type='file' device='disk'>
                  <driver name='qemu' type='qcow2'/>
                  <source file='\(escape(disk))'/>
                  <backingStore type='file'>
                    <format type='\(escape(base.format))'/>
                    <source file='\(escape(base.path))'/>
                    <backingStore/>
                  </backingStore>
                  <target dev='vda' bus='virtio'/>
                </disk>
                <disk type='file' device='cdrom'>
                  <driver name='qemu' type='raw'/>
                  <source file='\(escape(seed))'/>
                  <target dev='hdc' bus='ide'/>
                  <readonly/>
                </disk>
                \(interface)
                <serial type='file'>
                  <source path='\(escape(consoleLog))'/>
                  <target port='0'/>
                </serial>
                <channel type='unix'>
                  <target type='virtio' name='org.qemu.guest_agent.0'/>
                </channel>
              </devices>\(qemuArguments)
            </domain>
            """
    }

    private func escape(_ value: String) -> String { escapeXMLAttribute(value) }
}

/// The network QEMU's user-mode NAT gives its guest (QEMU's default, and
/// set explicitly on the netdev with an SSH forward).
let userNetwork = "10.0.2.0/24"
/// The address user-mode NAT's DHCP gives the guest (its only client).
/// libvirt cannot see it, so the agent reports this one.
let userGuestAddress = "10.0.2.15"

/// A locally administered MAC address in QEMU's 52:54:00 range, derived
/// from the instance's UUID so it stays the same across rebuilds.
func macAddress(for uuid: UUID) -> String {
    let bytes = withUnsafeBytes(of: uuid.uuid) { Array($0) }
    return String(format: "52:54:00:%02x:%02x:%02x", bytes[13], bytes[14], bytes[15])
}
